//! PostgreSQL logins: a role per lease.
//!
//! Created in one transaction, so a grant that fails leaves no role:
//!
//! ```sql
//! CREATE ROLE "mayfly_…" LOGIN PASSWORD 'SCRAM-SHA-256$…' VALID UNTIL '…'
//!   CONNECTION LIMIT n;
//! GRANT orders_reader TO "mayfly_…";          -- each scope's templates
//! ```
//!
//! The password is sent as a SCRAM-SHA-256 verifier computed here, so the
//! server, its statement log and its replicas never see it. `VALID UNTIL`
//! is the lease's expiry: PostgreSQL refuses the login after it with every
//! broker down.
//!
//! Revoked step by step, each its own transaction:
//! 1. `ALTER ROLE … NOLOGIN`: no new session;
//! 2. its sessions ended: listed from `pg_stat_activity` (which any role
//!    may read that far); for a login that has one, `GRANT <login> TO
//!    <manager>` (what lets a manager that is no superuser signal it),
//!    then `pg_terminate_backend`;
//! 3. (in [`Engine::ended`]) again until none is listed on two looks
//!    apart;
//! 4. (in [`Engine::remove`]) its sessions ended once more, then `DROP
//!    ROLE`; a login that owns objects or holds privileges (`DROP ROLE`
//!    refuses it) gets the membership, `REASSIGN OWNED` (if configured)
//!    and `DROP OWNED`, then `DROP ROLE` again.
//!
//! The manager is thus a member only of logins being ended that had a
//! session or own something, never of thousands: PostgreSQL walks all of
//! a role's memberships when it checks its privileges (each
//! `pg_stat_activity` row, each `DROP OWNED`), which made every step
//! slower with each live login.
//!
//! A role already gone counts as done at every step.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;

use crate::config::{ConfigError, DatabaseConfig, Owned};
use crate::template::Grant;
use crate::{Engine, EngineError, Login, LoginRequest, Secret, TIMEOUT, random_password};

/// One configured PostgreSQL database.
pub struct Postgres {
    name: String,
    prefix: String,
    grants: BTreeMap<String, Vec<Grant>>,
    owned: Owned,
    connection_limit: u32,
    /// The manager's user: a member of a login only while ending it.
    manager: String,
    /// Where agents connect: `scheme://host:port/db?params`, no user.
    connect: ConnectTo,
    pool: Pool,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("manager", &self.manager)
            .field("scopes", &self.grants.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The parts of an agent's DSN besides its user and password.
#[derive(Debug, Clone)]
struct ConnectTo {
    host: String,
    port: u16,
    dbname: String,
    /// `sslmode=…` and any other query parameters, as given.
    query: Option<String>,
}

impl ConnectTo {
    fn dsn(&self, user: &str, password: &str) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut dsn = format!(
            "postgres://{user}:{password}@{host}:{}/{}",
            self.port, self.dbname
        );
        if let Some(q) = &self.query {
            dsn.push('?');
            dsn.push_str(q);
        }
        dsn
    }
}

impl Postgres {
    /// Checks `config` and builds the engine (no connection yet).
    pub fn new(config: &DatabaseConfig, base: &Path) -> Result<Self, ConfigError> {
        let grants = config.grants()?;
        let owned = config.owned()?;
        let mut pg = tokio_postgres::Config::from_str(&config.url)
            .map_err(|e| config.invalid(format!("url: {e}")))?;
        if pg.get_password().is_some() {
            return Err(config
                .invalid("url holds a password: put it in a file and name it with password_file"));
        }
        let manager = pg
            .get_user()
            .ok_or_else(|| config.invalid("url names no user (the role manager)"))?
            .to_owned();
        if let Some(password) = config.password(base)? {
            pg.password(password.expose());
        }
        pg.connect_timeout(TIMEOUT);
        pg.application_name("mayfly");
        let tls = match &config.ca_file {
            Some(ca) => {
                pg.ssl_mode(SslMode::Require);
                tls_trusting(config, &config.read(base, ca)?)?
            }
            None => {
                pg.ssl_mode(SslMode::Disable);
                rustls_config(rustls::RootCertStore::empty())
            }
        };
        let connect = match &config.connect {
            Some(url) => connect_to(config, url)?,
            None => {
                let host = match pg.get_hosts().first() {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => return Err(config.invalid("url needs a TCP host")),
                };
                ConnectTo {
                    host,
                    port: pg.get_ports().first().copied().unwrap_or(5432),
                    dbname: pg.get_dbname().unwrap_or(&manager).to_owned(),
                    query: config
                        .ca_file
                        .as_ref()
                        .map(|_| "sslmode=verify-full".to_owned()),
                }
            }
        };
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = Manager::from_config(
            pg,
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            manager_config,
        );
        let pool = Pool::builder(mgr)
            .max_size(config.pool)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(|e| config.invalid(format!("pool: {e}")))?;
        Ok(Self {
            name: config.name.clone(),
            prefix: config.prefix.clone(),
            grants,
            owned,
            connection_limit: config.connection_limit,
            manager,
            connect,
            pool,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, EngineError> {
        self.pool.get().await.map_err(|e| EngineError::Unavailable {
            database: self.name.clone(),
            detail: describe_pool(&e),
        })
    }

    /// An error of `step` as the engine reports it: a connection that
    /// broke is unavailable, anything the server answered is refused.
    fn failed(&self, step: &'static str, e: &tokio_postgres::Error) -> EngineError {
        match e.as_db_error() {
            Some(db) => EngineError::Refused {
                database: self.name.clone(),
                step,
                detail: db.message().to_owned(),
            },
            None => EngineError::Unavailable {
                database: self.name.clone(),
                detail: format!("{step}: {e}"),
            },
        }
    }

    /// Runs `sql` on a pooled connection within [`TIMEOUT`]: the server's
    /// answer, or unavailable. A connection that did not answer in time
    /// is discarded, not handed out again.
    async fn query(
        &self,
        step: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>, EngineError> {
        let client = self.client().await?;
        match tokio::time::timeout(TIMEOUT, client.query(sql, params)).await {
            Ok(answer) => Ok(answer),
            Err(_) => {
                let _ = deadpool_postgres::Object::take(client);
                Err(EngineError::Unavailable {
                    database: self.name.clone(),
                    detail: format!("{step} did not finish in {}s", TIMEOUT.as_secs()),
                })
            }
        }
    }

    /// Runs one revocation step; a role already gone is done.
    async fn step(
        &self,
        step: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), EngineError> {
        match self.query(step, sql, params).await? {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(()),
            Err(e) => Err(self.failed(step, &e)),
        }
    }
}

impl Postgres {
    /// Which of `users` have a session open. Any role may read this much
    /// of `pg_stat_activity`.
    async fn with_sessions(&self, users: &[String]) -> Result<Vec<String>, EngineError> {
        let rows = self
            .query(
                "sessions",
                "SELECT DISTINCT usename::text FROM pg_stat_activity \
                 WHERE usename::text = ANY($1)",
                &[&users],
            )
            .await?
            .map_err(|e| self.failed("sessions", &e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Makes the manager a member of `user`: what lets a manager that is
    /// no superuser end the role's sessions and drop what it owns.
    async fn take_membership(&self, user: &str) -> Result<(), EngineError> {
        let sql = format!(
            "GRANT {} TO {}",
            escape_identifier(user),
            escape_identifier(&self.manager)
        );
        self.step("take membership", &sql, &[]).await
    }

    /// Ends every session of `users` (taking membership in each that has
    /// one); how many had one.
    async fn terminate(&self, users: &[String]) -> Result<usize, EngineError> {
        let open = self.with_sessions(users).await?;
        if open.is_empty() {
            return Ok(0);
        }
        for user in &open {
            self.take_membership(user).await?;
        }
        self.step(
            "terminate",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename::text = ANY($1) AND pid <> pg_backend_pid()",
            &[&open],
        )
        .await?;
        Ok(open.len())
    }

    /// `DROP ROLE`: `false` if the role still owns objects or holds
    /// privileges (which `DROP ROLE` never drops).
    async fn drop_role(&self, user: &str) -> Result<bool, EngineError> {
        let sql = format!("DROP ROLE {}", escape_identifier(user));
        match self.query("drop role", &sql, &[]).await? {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST) => Ok(false),
            Err(e) => Err(self.failed("drop role", &e)),
        }
    }
}

#[async_trait]
impl Engine for Postgres {
    fn name(&self) -> &str {
        &self.name
    }

    fn scopes(&self) -> Vec<&str> {
        self.grants.keys().map(String::as_str).collect()
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn create(&self, req: &LoginRequest) -> Result<Login, EngineError> {
        let password = random_password();
        let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
        let until = valid_until(req.expires_at);
        let role = escape_identifier(&req.user);
        let mut statements = vec![format!(
            "CREATE ROLE {role} LOGIN PASSWORD {} VALID UNTIL {} CONNECTION LIMIT {}",
            escape_literal(&verifier),
            escape_literal(&until),
            self.connection_limit,
        )];
        for scope in &req.scopes {
            for grant in self.grants.get(scope).into_iter().flatten() {
                statements.push(grant.statement(&req.user));
            }
        }
        let mut client = self.client().await?;
        let run = async {
            // One transaction: dropped without its commit, it rolls back.
            let tx = client.transaction().await?;
            for sql in &statements {
                tx.batch_execute(sql).await?;
            }
            tx.commit().await
        };
        match tokio::time::timeout(TIMEOUT, run).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.failed("create", &e)),
            Err(_) => {
                // Timed out mid-transaction: drop the connection, so the
                // server rolls it back, and report the database slow.
                let _ = deadpool_postgres::Object::take(client);
                return Err(EngineError::Unavailable {
                    database: self.name.clone(),
                    detail: format!("create did not finish in {}s", TIMEOUT.as_secs()),
                });
            }
        }
        let dsn = Secret::new(self.connect.dsn(&req.user, password.expose()));
        Ok(Login {
            user: req.user.clone(),
            password,
            dsn,
        })
    }

    async fn disable(&self, users: &[String]) -> Result<(), EngineError> {
        for user in users {
            let sql = format!("ALTER ROLE {} NOLOGIN", escape_identifier(user));
            self.step("nologin", &sql, &[]).await?;
        }
        // Their sessions told to end; `ended` waits until they have.
        self.terminate(users).await.map(drop)
    }

    async fn ended(&self, users: &[String]) -> Result<(), EngineError> {
        // None listed on two looks a quarter second apart, terminating
        // again while any is. A session that was authenticating when
        // NOLOGIN committed may get in and show up only after the first
        // look; `remove` ends any such one once more before the role is
        // dropped.
        let mut clear_looks = 0;
        for _ in 0..50 {
            if self.terminate(users).await? == 0 {
                clear_looks += 1;
                if clear_looks == 2 {
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            } else {
                clear_looks = 0;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        Err(EngineError::Refused {
            database: self.name.clone(),
            step: "terminate",
            detail: "sessions are still open after termination".into(),
        })
    }

    async fn remove(&self, user: &str) -> Result<(), EngineError> {
        self.terminate(std::slice::from_ref(&user.to_owned()))
            .await?;
        // A login that owns nothing and holds no privilege (only role
        // memberships, which go with it) is dropped as it is.
        if self.drop_role(user).await? {
            return Ok(());
        }
        self.take_membership(user).await?;
        let role = escape_identifier(user);
        if let Owned::Reassign(to) = &self.owned {
            let sql = format!("REASSIGN OWNED BY {role} TO {}", escape_identifier(to));
            self.step("reassign owned", &sql, &[]).await?;
        }
        self.step("drop owned", &format!("DROP OWNED BY {role}"), &[])
            .await?;
        if self.drop_role(user).await? {
            return Ok(());
        }
        Err(EngineError::Refused {
            database: self.name.clone(),
            step: "drop role",
            detail: format!("{user} still has dependent objects after DROP OWNED"),
        })
    }

    async fn exists(&self, user: &str) -> Result<bool, EngineError> {
        let rows = self
            .query(
                "exists",
                "SELECT 1 FROM pg_roles WHERE rolname = $1",
                &[&user],
            )
            .await?
            .map_err(|e| self.failed("exists", &e))?;
        Ok(!rows.is_empty())
    }

    async fn existing(&self) -> Result<Vec<String>, EngineError> {
        // `starts_with`, not LIKE: `_` in a prefix is a LIKE wildcard.
        let rows = self
            .query(
                "list",
                "SELECT rolname::text FROM pg_roles \
                 WHERE starts_with(rolname, $1) AND rolname <> current_user ORDER BY 1",
                &[&self.prefix],
            )
            .await?
            .map_err(|e| self.failed("list", &e))?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|name| crate::is_login_name(&self.prefix, name) && name != &self.manager)
            .collect())
    }
}

/// A `VALID UNTIL` time: UTC, to the second.
fn valid_until(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]+00");
    t.format(&format).unwrap_or_default()
}

fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        },
        deadpool_postgres::PoolError::Timeout(_) => {
            format!("no connection within {}s", TIMEOUT.as_secs())
        }
        other => other.to_string(),
    }
}

fn rustls_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    #[allow(clippy::expect_used)] // ring supports the default versions.
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn tls_trusting(config: &DatabaseConfig, pem: &[u8]) -> Result<rustls::ClientConfig, ConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| config.invalid(format!("ca_file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| config.invalid(format!("ca_file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(config.invalid("ca_file holds no certificate"));
    }
    Ok(rustls_config(roots))
}

fn connect_to(config: &DatabaseConfig, url: &str) -> Result<ConnectTo, ConfigError> {
    let parsed = tokio_postgres::Config::from_str(url)
        .map_err(|e| config.invalid(format!("connect: {e}")))?;
    if parsed.get_user().is_some() || parsed.get_password().is_some() {
        return Err(config.invalid("connect names no user or password: each login brings its own"));
    }
    let host = match parsed.get_hosts() {
        [Host::Tcp(h)] => h.clone(),
        _ => return Err(config.invalid("connect needs one TCP host")),
    };
    let dbname = parsed
        .get_dbname()
        .ok_or_else(|| config.invalid("connect names no database"))?
        .to_owned();
    Ok(ConnectTo {
        host,
        port: parsed.get_ports().first().copied().unwrap_or(5432),
        dbname,
        query: url.split_once('?').map(|(_, q)| q.to_owned()),
    })
}
