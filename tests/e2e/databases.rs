//! Database logins through the broker, against a real PostgreSQL (`initdb`
//! and `pg_ctl` on a free port), checked with psql: a login that can do
//! what its scope grants, refused and its session ended once the task
//! completes, and the refusals of what is not exactly allowed.

use std::time::{Duration, Instant};

use mayfly_client::pb;
use mayfly_testkit::{ORDERS_MANAGER_PASSWORD, PgServer, TestBroker, psql};
use tonic::Code;

use crate::common::{assert_status, audit_trail, start_request, task_leases};

const ORDERS: &str = "postgres://orders";

const POLICIES: &str = r#"
@id("db-tasks")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"start_task",
        resource == Mayfly::Audience::"postgres://orders");

@id("db-logins")
@max_ttl("10m")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"issue_database_login",
        resource == Mayfly::Audience::"postgres://orders")
when { ["db:read", "db:write"].containsAll(context.scopes) };
"#;

fn orders_db() -> PgServer {
    PgServer::orders()
}

async fn broker(pg: &PgServer, dir: &std::path::Path) -> TestBroker {
    broker_on(pg, dir, None).await
}

/// The broker, on the Redis at `redis` if one is given.
async fn broker_on(pg: &PgServer, dir: &std::path::Path, redis: Option<String>) -> TestBroker {
    let pw = dir.join("manager.pw");
    std::fs::write(&pw, ORDERS_MANAGER_PASSWORD).unwrap();
    let entry = format!(
        r#"
        name = "{ORDERS}"
        url = "postgres://mayfly_manager@127.0.0.1:{}/orders"
        password_file = "{}"
        max_ttl = "2m"
        [scopes]
        "db:read" = ["GRANT orders_reader TO {{role}}"]
        "db:write" = ["GRANT orders_writer TO {{role}}"]
        "db:admin" = ["GRANT orders_writer TO {{role}}"]
        "#,
        pg.port(),
        pw.display()
    );
    TestBroker::start_with(|c| {
        mayfly_testkit::use_policies(c, POLICIES);
        c.databases.push(toml::from_str(&entry).unwrap());
        if let Some(url) = redis {
            c.store = mayfly_broker::config::StoreKind::Redis;
            c.redis = Some(mayfly_broker::config::RedisConfig {
                url: Some(url),
                key_prefix: "mayfly".into(),
                ..Default::default()
            });
        }
    })
    .await
}

/// The trail once it holds an `event` record naming `user` (a drop is
/// recorded only after the login is confirmed gone); panics after 10 s.
async fn recorded(op: &mayfly_client::Client, event: &str, user: &str) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let trail = audit_trail(op).await;
        if trail.iter().any(|r| r.contains(event) && r.contains(user)) {
            return trail;
        }
        assert!(Instant::now() < until, "no {event} record for {user}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A task of `agent` for `database` with `scopes`; its id.
async fn open_task(agent: &mayfly_client::Client, database: &str, scopes: &[&str]) -> String {
    agent
        .broker()
        .start_task(start_request("reconcile orders", &[database], scopes))
        .await
        .unwrap()
        .into_inner()
        .task_id
}

/// A login of `agent` under `task`, which must be issued (or pending).
async fn login(
    agent: &mayfly_client::Client,
    task: &str,
    database: &str,
    scopes: &[&str],
) -> pb::DatabaseCredential {
    agent
        .broker()
        .issue_database_credential(login_request(task, database, scopes))
        .await
        .unwrap()
        .into_inner()
}

fn login_request(
    task: &str,
    database: &str,
    scopes: &[&str],
) -> pb::IssueDatabaseCredentialRequest {
    pb::IssueDatabaseCredentialRequest {
        task_id: task.into(),
        database: database.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl_seconds: 0,
        approval_id: String::new(),
    }
}

/// With `database` down: a login is refused UNAVAILABLE and leaves no
/// lease (`task`'s one login lease is still `login`'s); then `task` ends,
/// and the drop of `login`, which fails while the database is down, is
/// counted on /metrics.
async fn ended_while_down(
    broker: &TestBroker,
    agent: &mayfly_client::Client,
    task: &str,
    database: &str,
    scope: &str,
    login: &pb::DatabaseCredential,
) {
    let op = broker.operator().await;
    let name = database.rsplit('/').next().unwrap_or(database);
    assert_status(
        agent
            .broker()
            .issue_database_credential(login_request(task, database, &[scope]))
            .await,
        Code::Unavailable,
        name,
    );
    let logins = task_leases(&op, task)
        .await
        .into_iter()
        .filter(|l| l.kind == pb::LeaseKind::DatabaseLogin as i32)
        .map(|l| l.lease_id)
        .collect::<Vec<_>>();
    assert_eq!(
        logins,
        std::slice::from_ref(&login.lease_id),
        "a lease was left for a login never made"
    );
    agent.complete_task(task).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = crate::common::scrape(broker).await;
    assert!(
        crate::common::count(&metrics, "mayfly_database_login_drop_failures_total") >= 1.0,
        "the failed drop is not counted:\n{metrics}"
    );
}

#[tokio::test]
async fn a_database_login_lives_and_dies_with_its_task() {
    let pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(&pg, dir.path()).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = open_task(&agent, ORDERS, &["db:read", "db:write"]).await;

    let login = login(&agent, &task, ORDERS, &["db:read"]).await;
    assert!(login.user.starts_with("mayfly_"), "{}", login.user);
    assert_eq!(login.database, ORDERS);
    // The database's own maximum lifetime (2m, under the tokens' 15m),
    // which PostgreSQL enforces as VALID UNTIL.
    let expires = login.expires_at.unwrap().seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now + 100..=now + 120).contains(&expires),
        "a login for {} s",
        expires - now
    );
    let until = pg
        .psql(
            "orders",
            &format!(
                "SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles \
                 WHERE rolname = '{}'",
                login.user
            ),
        )
        .unwrap();
    assert_eq!(until, expires.to_string());
    assert_eq!(psql(&login.dsn, "SELECT amount FROM orders").unwrap(), "50");
    let refused = psql(&login.dsn, "INSERT INTO orders VALUES (2, 1)").unwrap_err();
    assert!(refused.contains("permission denied"), "{refused}");
    let lease = task_leases(&op, &task)
        .await
        .into_iter()
        .find(|l| l.lease_id == login.lease_id)
        .unwrap();
    assert_eq!(lease.kind, pb::LeaseKind::DatabaseLogin as i32);

    // A session open when the task completes is ended; the login is
    // refused from then on, and the role is gone.
    let user = login.user.clone();
    let mut open = std::process::Command::new("psql")
        .args(["-X", "-d", &login.dsn, "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::common::eventually("the session is open", || {
        let open = pg
            .psql(
                "orders",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE usename = '{user}' AND query LIKE 'SELECT pg_sleep%'"
                ),
            )
            .unwrap();
        std::future::ready(open == "1")
    })
    .await;
    agent.complete_task(&task).await.unwrap();
    let completed = Instant::now();
    let ended = loop {
        if let Some(status) = open.try_wait().unwrap() {
            break status;
        }
        if completed.elapsed() > Duration::from_secs(20) {
            let _ = open.kill();
            panic!("a session open when the task completed was still running 20 s later");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut open.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!ended.success(), "the open session survived: {stderr}");
    assert!(stderr.contains("terminating connection"), "{stderr}");
    loop {
        if psql(&login.dsn, "SELECT 1").is_err() {
            break;
        }
        assert!(
            completed.elapsed() < Duration::from_secs(10),
            "the login still worked 10 s after the task completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crate::common::eventually("the role is dropped", || {
        let gone = pg
            .psql(
                "orders",
                &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{user}'"),
            )
            .unwrap();
        std::future::ready(gone == "0")
    })
    .await;

    // The trail holds the issue and the drop with the login's name (the
    // drop is recorded once the role is confirmed gone), and never its
    // password.
    let trail = recorded(&op, "database_login_dropped", &login.user).await;
    let joined = trail.join("\n");
    assert!(
        !joined.contains(&login.password),
        "a password reached the trail"
    );
    for event in ["database_login_issued", "database_login_dropped"] {
        assert!(
            trail
                .iter()
                .any(|r| r.contains(event) && r.contains(&login.user)),
            "no {event} record for {}",
            login.user
        );
    }
    assert!(
        trail
            .iter()
            .any(|r| r.contains("database_login_dropped") && r.contains("task_completed")),
        "the drop does not say why"
    );
}

#[tokio::test]
async fn what_is_not_exactly_allowed_is_refused_and_a_database_down_issues_nothing() {
    let mut pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(&pg, dir.path()).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = open_task(&agent, ORDERS, &["db:read"]).await;
    let issue = |req| {
        let agent = agent.clone();
        async move { agent.broker().issue_database_credential(req).await }
    };

    assert_status(
        issue(login_request(&task, "postgres://payroll", &["db:read"])).await,
        Code::NotFound,
        "not configured",
    );
    // Defined by the database, but outside the task's envelope.
    assert_status(
        issue(login_request(&task, ORDERS, &["db:write"])).await,
        Code::PermissionDenied,
        "db:write",
    );
    // Inside neither.
    assert_status(
        issue(login_request(&task, ORDERS, &["db:drop"])).await,
        Code::InvalidArgument,
        "db:drop",
    );
    // Another agent's task.
    let other = broker.client_as("spiffe://example.org/agent/other").await;
    assert_status(
        other
            .broker()
            .issue_database_credential(login_request(&task, ORDERS, &["db:read"]))
            .await,
        Code::NotFound,
        "task",
    );

    // A login made while the database is up, whose task ends while it is
    // down: its drop waits for the database and finishes when it returns.
    let login = issue(login_request(&task, ORDERS, &["db:read"]))
        .await
        .unwrap()
        .into_inner();
    pg.stop();
    ended_while_down(&broker, &agent, &task, ORDERS, "db:read", &login).await;
    pg.start_again();
    let user = login.user.clone();
    let until = Instant::now() + Duration::from_secs(45);
    loop {
        let left = pg
            .psql(
                "orders",
                &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{user}'"),
            )
            .unwrap();
        if left == "0" {
            break;
        }
        assert!(Instant::now() < until, "the pending drop never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for event in ["database_login_drop_failed", "database_login_dropped"] {
        recorded(&op, event, &user).await;
    }
}

/// Logins ended together are disabled as one batch; one the manager may
/// not touch (made a superuser behind the broker's back) fails alone: the
/// others are dropped, and it stays held, counted and recorded.
#[tokio::test]
async fn a_login_that_cannot_be_dropped_does_not_hold_up_the_others() {
    let pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(&pg, dir.path()).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = open_task(&agent, ORDERS, &["db:read"]).await;
    let mut users = Vec::new();
    for _ in 0..4 {
        let login = login(&agent, &task, ORDERS, &["db:read"]).await;
        users.push(login.user);
    }
    let stuck = users[1].clone();
    pg.psql("orders", &format!("ALTER ROLE \"{stuck}\" SUPERUSER"))
        .unwrap();
    agent.complete_task(&task).await.unwrap();

    for user in users.iter().filter(|u| **u != stuck) {
        recorded(&op, "database_login_dropped", user).await;
        let left = pg
            .psql(
                "orders",
                &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{user}'"),
            )
            .unwrap();
        assert_eq!(left, "0", "{user} was recorded dropped but still exists");
    }
    let trail = recorded(&op, "database_login_drop_failed", &stuck).await;
    assert!(
        !trail
            .iter()
            .any(|r| r.contains("database_login_dropped") && r.contains(&stuck)),
        "a login that was not dropped was recorded dropped"
    );
    let still = pg
        .psql(
            "orders",
            &format!("SELECT rolcanlogin FROM pg_roles WHERE rolname = '{stuck}'"),
        )
        .unwrap();
    assert_eq!(
        still, "t",
        "the superuser login is out of the manager's reach"
    );
    crate::common::eventually("one login held, its failure counted", || async {
        let metrics = crate::common::scrape(&broker).await;
        crate::common::count(&metrics, "mayfly_database_login_drop_failures_total") >= 1.0
            && crate::common::count(&metrics, "mayfly_database_logins_held") == 1.0
    })
    .await;
}

/// Two replicas on one Redis both see every hold and every revocation;
/// each login (and an orphan) is dropped and recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_drop_each_login_once() {
    let pg = orders_db();
    let orphan = "mayfly_0123456789abcdef01234567";
    pg.psql("orders", &format!("CREATE ROLE {orphan} LOGIN"))
        .unwrap();
    let redis = mayfly_testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = broker_on(&pg, dir.path(), Some(redis.url())).await;
    let b = a.replica().await;
    let (agent_a, agent_b) = (a.agent().await, b.agent().await);
    let op = a.operator().await;
    let task = open_task(&agent_a, ORDERS, &["db:read"]).await;
    let mut users = Vec::new();
    for agent in [&agent_a, &agent_b, &agent_a, &agent_b, &agent_a, &agent_b] {
        let login = login(agent, &task, ORDERS, &["db:read"]).await;
        users.push(login.user);
    }
    agent_b.complete_task(&task).await.unwrap();

    for user in users.iter().chain([&orphan.to_owned()]) {
        recorded(&op, "database_login_dropped", user).await;
    }
    // Both replicas have had time to act on every revocation and hold
    // (a pass runs every 2 s); the trail is the one both record to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let trail = audit_trail(&op).await;
    for user in users.iter().chain([&orphan.to_owned()]) {
        let drops = trail
            .iter()
            .filter(|r| r.contains("database_login_dropped") && r.contains(user.as_str()))
            .count();
        assert_eq!(drops, 1, "{user} was recorded dropped {drops} times");
        assert!(
            !trail
                .iter()
                .any(|r| r.contains("database_login_drop_failed") && r.contains(user.as_str())),
            "a replica failed dropping {user} (the two raced)"
        );
    }
    let left = pg
        .psql(
            "orders",
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'mayfly\\_%' AND rolname <> 'mayfly_manager'",
        )
        .unwrap();
    assert_eq!(left, "0");
}

/// The same seam with the Redis engine: an ACL user confined to its keys,
/// disconnected and gone once the task completes.
const CACHE: &str = "redis://cache";

/// A broker managing the logins of `redis_server` as `redis://cache`,
/// with one scope: reads of `orders:*`.
async fn cache_broker(redis_server: &mayfly_testkit::RedisServer) -> TestBroker {
    let entry = format!(
        r#"
        name = "{CACHE}"
        url = "redis://127.0.0.1:{}"
        [scopes]
        "cache:read" = ["%R~orders:*", "+@read", "+@connection"]
        "#,
        redis_server.port()
    );
    TestBroker::start_with(|c| {
        mayfly_testkit::use_policies(
            c,
            &POLICIES
                .replace(ORDERS, CACHE)
                .replace("db:read\", \"db:write", "cache:read"),
        );
        c.databases.push(toml::from_str(&entry).unwrap());
    })
    .await
}

#[tokio::test]
async fn a_redis_login_lives_and_dies_with_its_task() {
    let redis_server = mayfly_testkit::RedisServer::start();
    let broker = cache_broker(&redis_server).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let admin = redis::Client::open(redis_server.url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg("orders:1")
        .arg("50")
        .query_async(&mut admin)
        .await
        .unwrap();
    let task = open_task(&agent, CACHE, &["cache:read"]).await;
    let login = login(&agent, &task, CACHE, &["cache:read"]).await;
    let client = redis::Client::open(login.dsn.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let got: String = redis::cmd("GET")
        .arg("orders:1")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, "50");
    let write = redis::cmd("SET")
        .arg("orders:1")
        .arg("0")
        .query_async::<redis::Value>(&mut con)
        .await;
    assert!(write.is_err(), "a read login wrote");

    agent.complete_task(&task).await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while client.get_multiplexed_async_connection().await.is_ok() {
        assert!(
            Instant::now() < until,
            "the login still worked after the task completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = redis::cmd("GET")
        .arg("orders:1")
        .query_async::<redis::Value>(&mut con)
        .await;
    assert!(after.is_err(), "the open connection survived");
    // Recorded once the user is confirmed gone: wait for it.
    let trail = recorded(&op, "database_login_dropped", &login.user).await;
    assert!(!trail.join("\n").contains(&login.password));
}

/// Redis as PostgreSQL: an ACL user of the engine's shape that no lease
/// accounts for is swept at start (recorded as an orphan, the server's own
/// users untouched); with the server down nothing is issued and no lease
/// is left; a login whose task ends meanwhile is recorded as dropped once
/// the server is back (a restart forgets ACL users that were never saved,
/// so it finds the user gone). The refused issue's own hold stays for the
/// grace an issue in flight is given (`UNRECORDED_GRACE`), as for
/// PostgreSQL.
#[tokio::test]
async fn a_redis_cache_down_issues_nothing_and_its_orphans_and_pending_drops_end() {
    let mut redis_server = mayfly_testkit::RedisServer::start();
    let orphan = "mayfly_0123456789abcdef01234567";
    redis_server.cli(&["ACL", "SETUSER", orphan, "on", ">pw", "~*", "+@all"]);
    redis_server.cli(&["ACL", "SETUSER", "mayfly_ops", "on", ">pw", "~*", "+@all"]);
    let broker = cache_broker(&redis_server).await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let trail = recorded(&op, "database_login_dropped", orphan).await;
    assert!(
        trail
            .iter()
            .any(|r| r.contains(orphan) && r.contains("orphan")),
        "the sweep's drop does not say orphan"
    );
    let users = redis_server.cli(&["ACL", "USERS"]);
    assert!(!users.contains(orphan), "{users}");
    assert!(
        users.contains("mayfly_ops") && users.contains("default"),
        "a user not of the engine's shape was touched: {users}"
    );

    let task = open_task(&agent, CACHE, &["cache:read"]).await;
    let login = login(&agent, &task, CACHE, &["cache:read"]).await;
    redis_server.kill();
    ended_while_down(&broker, &agent, &task, CACHE, "cache:read", &login).await;
    redis_server.restart();
    for event in ["database_login_drop_failed", "database_login_dropped"] {
        recorded(&op, event, &login.user).await;
    }
}

/// A login policy asks an operator for: pending with an approval id, then
/// issued once on it, and the approval refused a second time.
#[tokio::test]
async fn a_login_that_needs_approval_waits_for_an_operator_and_is_issued_once() {
    let pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("manager.pw");
    std::fs::write(&pw, ORDERS_MANAGER_PASSWORD).unwrap();
    let entry = format!(
        "name = \"{ORDERS}\"\nurl = \"postgres://mayfly_manager@127.0.0.1:{}/orders\"\n\
         password_file = \"{}\"\n[scopes]\n\"db:write\" = [\"GRANT orders_writer TO {{role}}\"]\n",
        pg.port(),
        pw.display()
    );
    let policies = POLICIES.replace(
        "@max_ttl(\"10m\")",
        "@max_ttl(\"10m\")\n@approval(\"required\")",
    );
    let broker = TestBroker::start_with(|c| {
        mayfly_testkit::use_policies(c, &policies);
        c.databases.push(toml::from_str(&entry).unwrap());
    })
    .await;
    let agent = broker.agent().await;
    let op = broker.operator().await;
    let task = open_task(&agent, ORDERS, &["db:write"]).await;
    let pending = login(&agent, &task, ORDERS, &["db:write"]).await;
    let approval = pending.approval.expect("an approval, not a login");
    assert!(pending.user.is_empty() && pending.password.is_empty());
    assert_eq!(approval.kind, pb::LeaseKind::DatabaseLogin as i32);
    assert_eq!(approval.audience, ORDERS);
    assert_eq!(pg.psql("orders", "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'mayfly\\_%' AND rolname <> 'mayfly_manager'").unwrap(), "0");

    op.admin()
        .approve(pb::DecideApprovalRequest {
            approval_id: approval.approval_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let mut req = login_request(&task, ORDERS, &["db:write"]);
    req.approval_id = approval.approval_id.clone();
    let login = agent
        .broker()
        .issue_database_credential(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(login.approval.is_none());
    psql(&login.dsn, "INSERT INTO orders VALUES (9, 9)").unwrap();
    assert_status(
        agent.broker().issue_database_credential(req).await,
        Code::FailedPrecondition,
        "consumed",
    );
}
