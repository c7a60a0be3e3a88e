//! The engines against a real PostgreSQL (`initdb`/`pg_ctl` on a free port)
//! and a real `redis-server`, checked with psql and a plain Redis client:
//! what a login may do, and that revocation leaves nothing usable behind.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mayfly_secrets::{DatabaseConfig, Engine, EngineError, LoginRequest, login_name};
use mayfly_testkit::{ORDERS_MANAGER_PASSWORD, PgServer, RedisServer, psql};

/// The shared `orders` database ([`PgServer::orders`]).
fn orders_db() -> PgServer {
    PgServer::orders()
}

fn engine(dir: &Path, text: &str) -> Arc<dyn Engine> {
    #[derive(serde::Deserialize)]
    struct File {
        databases: Vec<DatabaseConfig>,
    }
    let file: File = toml::from_str(text).unwrap();
    mayfly_secrets::load(&file.databases[0], dir).unwrap()
}

fn postgres_engine(pg: &PgServer, dir: &Path, owned: &str) -> Arc<dyn Engine> {
    std::fs::write(
        dir.join("manager.pw"),
        format!("{ORDERS_MANAGER_PASSWORD}\n"),
    )
    .unwrap();
    engine(
        dir,
        &format!(
            r#"
            [[databases]]
            name = "postgres://orders"
            url = "postgres://mayfly_manager@127.0.0.1:{}/orders"
            password_file = "manager.pw"
            connection_limit = 3
            owned = "{owned}"
            [databases.scopes]
            "db:read" = ["GRANT orders_reader TO {{role}}"]
            "db:write" = ["GRANT orders_writer TO {{role}}"]
            "db:create" = ["GRANT CREATE ON SCHEMA public TO {{role}}"]
            "#,
            pg.port()
        ),
    )
}

fn request(_lease: &str, scopes: &[&str], ttl: Duration) -> LoginRequest {
    LoginRequest {
        user: login_name("mayfly_"),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expires_at: SystemTime::now() + ttl,
    }
}

#[tokio::test]
async fn a_postgres_login_can_do_what_its_scopes_grant_and_nothing_after_revocation() {
    let pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    let engine = postgres_engine(&pg, dir.path(), "drop");
    let login = engine
        .create(&request("lease-a", &["db:read"], Duration::from_secs(600)))
        .await
        .unwrap();
    let dsn = login.dsn.expose().to_owned();
    assert!(dsn.contains(&login.user) && dsn.contains(login.password.expose()));

    // It reads, and may not write: only what db:read grants.
    assert_eq!(
        psql(&dsn, "SELECT amount FROM orders WHERE id = 1").unwrap(),
        "50"
    );
    let refused = psql(&dsn, "INSERT INTO orders VALUES (2, 10)").unwrap_err();
    assert!(refused.contains("permission denied"), "{refused}");
    // Its password is stored as a SCRAM verifier; VALID UNTIL is set.
    let row = pg
        .psql(
            "orders",
            &format!(
                "SELECT rolpassword LIKE 'SCRAM-SHA-256$%', rolvaliduntil IS NOT NULL, \
                 rolconnlimit FROM pg_authid WHERE rolname = '{}'",
                login.user
            ),
        )
        .unwrap();
    assert_eq!(row, "t|t|3");

    // A session open when the login is revoked is ended, and no new one
    // is allowed; the role is gone.
    let mut open = std::process::Command::new("psql")
        .args(["-X", "-d", &dsn, "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let user = login.user.clone();
    wait_until(|| {
        pg.psql(
            "orders",
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = '{user}' AND query LIKE 'SELECT pg_sleep%'"
            ),
        )
        .unwrap()
            == "1"
    });
    // Its own logins only: never the manager, which shares the prefix.
    assert_eq!(engine.existing().await.unwrap(), vec![login.user.clone()]);
    engine.revoke(&login.user).await.unwrap();
    let ended = open.wait().unwrap();
    assert!(!ended.success(), "the open session survived revocation");
    let refused = psql(&dsn, "SELECT 1").unwrap_err();
    assert!(refused.contains("authentication failed"), "{refused}");
    assert!(!engine.exists(&login.user).await.unwrap());
    assert!(!engine.existing().await.unwrap().contains(&login.user));
    // Revoking again (a retry after a crash) finishes quietly.
    engine.revoke(&login.user).await.unwrap();
}

#[tokio::test]
async fn logins_disabled_together_are_all_shut_and_their_sessions_ended() {
    let pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    let engine = postgres_engine(&pg, dir.path(), "drop");
    let mut logins = Vec::new();
    for _ in 0..3 {
        let req = request("lease-n", &["db:read"], Duration::from_secs(600));
        logins.push(engine.create(&req).await.unwrap());
    }
    let kept = engine
        .create(&request("lease-k", &["db:read"], Duration::from_secs(600)))
        .await
        .unwrap();
    // A session open for two of the three, and for the one kept.
    let mut open: Vec<std::process::Child> = [&logins[0], &logins[1], &kept]
        .iter()
        .map(|l| {
            std::process::Command::new("psql")
                .args(["-X", "-d", l.dsn.expose(), "-c", "SELECT pg_sleep(60)"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until(|| {
        pg.psql(
            "orders",
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'",
        )
        .unwrap()
            == "3"
    });

    // One of them already gone (a retry after a crash) is no error.
    engine.revoke(&logins[2].user).await.unwrap();
    let users: Vec<String> = logins.iter().map(|l| l.user.clone()).collect();
    engine.disable(&users).await.unwrap();
    engine.ended(&users).await.unwrap();
    for child in &mut open[..2] {
        assert!(!child.wait().unwrap().success(), "a session survived");
    }
    for login in &logins[..2] {
        let refused = psql(login.dsn.expose(), "SELECT 1").unwrap_err();
        assert!(refused.contains("not permitted to log in"), "{refused}");
        // Disabled, not yet removed.
        assert!(engine.exists(&login.user).await.unwrap());
    }
    // The login not named is untouched, its session too.
    assert_eq!(psql(kept.dsn.expose(), "SELECT 1").unwrap(), "1");
    assert!(open[2].try_wait().unwrap().is_none());
    open[2].kill().unwrap();
    let _ = open[2].wait();
    let members_sql = "SELECT count(*) FROM pg_auth_members m \
                       JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = 'mayfly_manager'";
    assert_eq!(
        pg.psql("orders", members_sql).unwrap(),
        "2",
        "the manager is a member of the logins whose sessions it ended, only"
    );
    for login in &logins[..2] {
        engine.remove(&login.user).await.unwrap();
        assert!(!engine.exists(&login.user).await.unwrap());
    }
    // Ending a login with no session and nothing owned never makes the
    // manager a member of it.
    let quiet = engine
        .create(&request("lease-q", &["db:read"], Duration::from_secs(600)))
        .await
        .unwrap();
    engine.revoke(&quiet.user).await.unwrap();
    assert!(!engine.exists(&quiet.user).await.unwrap());
    assert_eq!(pg.psql("orders", members_sql).unwrap(), "0");
}

#[tokio::test]
async fn a_postgres_login_is_refused_by_the_server_after_its_expiry() {
    let pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    let engine = postgres_engine(&pg, dir.path(), "drop");
    let login = engine
        .create(&request("lease-b", &["db:read"], Duration::from_secs(2)))
        .await
        .unwrap();
    psql(login.dsn.expose(), "SELECT 1").unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    // Nothing revoked it: PostgreSQL's own VALID UNTIL refuses it.
    let refused = psql(login.dsn.expose(), "SELECT 1").unwrap_err();
    assert!(refused.contains("authentication failed"), "{refused}");
    assert!(engine.exists(&login.user).await.unwrap());
}

#[tokio::test]
async fn a_role_that_owns_objects_and_holds_grants_is_still_dropped() {
    let pg = orders_db();
    pg.psql(
        "orders",
        "GRANT CREATE ON SCHEMA public TO mayfly_manager WITH GRANT OPTION;
         GRANT orders_owner TO mayfly_manager",
    )
    .unwrap();
    for owned in ["drop", "reassign:orders_owner"] {
        let dir = tempfile::tempdir().unwrap();
        let engine = postgres_engine(&pg, dir.path(), owned);
        let login = engine
            .create(&request(
                &format!("lease-{owned}"),
                &["db:write", "db:create"],
                Duration::from_secs(600),
            ))
            .await
            .unwrap();
        let table = format!("scratch_{}", owned.len());
        psql(
            login.dsn.expose(),
            &format!("CREATE TABLE {table} (x int); INSERT INTO orders VALUES (3, 1)"),
        )
        .unwrap();
        engine.revoke(&login.user).await.unwrap();
        assert!(!engine.exists(&login.user).await.unwrap());
        let kept = pg
            .psql(
                "orders",
                &format!(
                    "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = '{table}'"
                ),
            )
            .unwrap();
        match owned {
            "drop" => assert_eq!(kept, "", "the dropped role's table was kept"),
            _ => assert_eq!(kept, "orders_owner"),
        }
    }
}

#[tokio::test]
async fn a_grant_that_fails_leaves_no_role_and_a_stopped_server_is_unavailable() {
    let mut pg = orders_db();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manager.pw"), ORDERS_MANAGER_PASSWORD).unwrap();
    let engine = engine(
        dir.path(),
        &format!(
            r#"
            [[databases]]
            name = "postgres://orders"
            url = "postgres://mayfly_manager@127.0.0.1:{}/orders"
            password_file = "manager.pw"
            [databases.scopes]
            "db:read" = ["GRANT orders_reader TO {{role}}", "GRANT no_such_role TO {{role}}"]
            "#,
            pg.port()
        ),
    );
    let req = request("lease-c", &["db:read"], Duration::from_secs(600));
    let e = engine.create(&req).await.unwrap_err();
    assert!(matches!(e, EngineError::Refused { .. }), "{e}");
    assert!(
        !engine.exists(&req.user).await.unwrap(),
        "a half-made role was left"
    );

    pg.stop();
    let e = engine
        .create(&request("lease-d", &["db:read"], Duration::from_secs(600)))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(engine.revoke(&req.user).await.unwrap_err().is_unavailable());
}

#[tokio::test]
async fn a_redis_login_touches_only_its_keys_and_is_gone_with_its_clients() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(
        dir.path(),
        &format!(
            r#"
            [[databases]]
            name = "redis://cache"
            url = "redis://127.0.0.1:{}"
            [databases.scopes]
            "cache:read" = ["%R~orders:*", "+@read", "+@connection"]
            "cache:write" = ["%W~orders:*", "+@write"]
            "#,
            redis.port()
        ),
    );
    let admin = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port())).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg("orders:1")
        .arg("50")
        .query_async(&mut admin)
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg("payroll:1")
        .arg("9000")
        .query_async(&mut admin)
        .await
        .unwrap();

    let login = engine
        .create(&request(
            "lease-r",
            &["cache:read"],
            Duration::from_secs(600),
        ))
        .await
        .unwrap();
    let client = redis::Client::open(login.dsn.expose()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let got: String = redis::cmd("GET")
        .arg("orders:1")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, "50");
    for refused in [
        redis::cmd("GET").arg("payroll:1").clone(),
        redis::cmd("SET").arg("orders:1").arg("0").clone(),
        redis::cmd("FLUSHALL").clone(),
    ] {
        let e = refused
            .query_async::<redis::Value>(&mut con)
            .await
            .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("noperm"), "{e}");
    }
    assert_eq!(engine.existing().await.unwrap(), vec![login.user.clone()]);

    engine.revoke(&login.user).await.unwrap();
    let after = redis::cmd("GET")
        .arg("orders:1")
        .query_async::<redis::Value>(&mut con)
        .await;
    assert!(after.is_err(), "the open connection survived revocation");
    assert!(
        client.get_multiplexed_async_connection().await.is_err(),
        "a revoked login logged in"
    );
    assert!(!engine.exists(&login.user).await.unwrap());
    engine.revoke(&login.user).await.unwrap();
}

fn wait_until(mut ok: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(std::time::Instant::now() < until, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}
