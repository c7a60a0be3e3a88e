//! Redis logins: an ACL user per lease.
//!
//! Created with one `ACL SETUSER <user> reset on #<sha256> resetchannels
//! <rules…>`, atomic in Redis (a rule it refuses leaves no user), with the
//! password's SHA-256 rather than the password, so it never crosses the
//! wire or reaches the server's logs. Each scope's rules are key patterns
//! (`~orders:*`, `%R~…`), channel patterns (`&…`) and commands or
//! categories (`+@read`, `-flushdb`), checked when the configuration loads:
//! nothing that sets a password, switches the user on or off, or resets it.
//!
//! Revoked with `ACL DELUSER` (which also disconnects it) and then `CLIENT
//! KILL USER` for any session that raced it: disabling and removing are
//! one step here. Redis has no expiry for
//! users: the broker revokes a login when its lease expires.

use std::path::Path;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use crate::config::{ConfigError, DatabaseConfig};
use crate::{Engine, EngineError, Login, LoginRequest, Secret, TIMEOUT, random_password};

/// One configured Redis.
pub struct RedisAcl {
    name: String,
    prefix: String,
    scopes: std::collections::BTreeMap<String, Vec<String>>,
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    /// Where agents connect: `redis[s]://host:port`, no user.
    connect: url::Url,
}

impl std::fmt::Debug for RedisAcl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAcl")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("scopes", &self.scopes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Whether `rule` only says what a user may touch.
fn allowed_rule(rule: &str) -> bool {
    let pattern = |p: &str| {
        !p.is_empty()
            && !p
                .bytes()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    };
    let command = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'|' | b'_' | b'-'))
    };
    if let Some(p) = rule.strip_prefix('~').or_else(|| rule.strip_prefix('&')) {
        return pattern(p);
    }
    for perm in ["%R~", "%W~", "%RW~"] {
        if let Some(p) = rule.strip_prefix(perm) {
            return pattern(p);
        }
    }
    if let Some(c) = rule.strip_prefix("+@").or_else(|| rule.strip_prefix("-@")) {
        return command(c);
    }
    if let Some(c) = rule.strip_prefix('+').or_else(|| rule.strip_prefix('-')) {
        return command(c);
    }
    matches!(rule, "allkeys" | "allchannels")
}

impl RedisAcl {
    /// Checks `config` and builds the engine (no connection yet).
    pub fn new(config: &DatabaseConfig, base: &Path) -> Result<Self, ConfigError> {
        for (scope, rules) in &config.scopes {
            if let Some(bad) = rules.iter().find(|r| !allowed_rule(r)) {
                return Err(config.invalid(format!(
                    "scope {scope:?}: ACL rule {bad:?} is not a key, channel or command rule \
                     (~pattern, %R~pattern, &pattern, +@category, -command, …)"
                )));
            }
        }
        let mut url =
            url::Url::parse(&config.url).map_err(|e| config.invalid(format!("url: {e}")))?;
        if url.password().is_some() {
            return Err(config
                .invalid("url holds a password: put it in a file and name it with password_file"));
        }
        if !matches!(url.scheme(), "redis" | "rediss") || url.host_str().is_none() {
            return Err(config.invalid("url must be redis://host:port or rediss://host:port"));
        }
        let mut connect = url.clone();
        let _ = connect.set_username("");
        connect.set_path("");
        if let Some(c) = &config.connect {
            connect = url::Url::parse(c).map_err(|e| config.invalid(format!("connect: {e}")))?;
            if !connect.username().is_empty() || connect.password().is_some() {
                return Err(
                    config.invalid("connect names no user or password: each login brings its own")
                );
            }
        }
        if let Some(password) = config.password(base)? {
            url.set_password(Some(password.expose()))
                .map_err(|()| config.invalid("url cannot take a password"))?;
        }
        let client = match &config.ca_file {
            Some(ca) => {
                if url.scheme() != "rediss" {
                    return Err(config.invalid("ca_file needs a rediss:// url"));
                }
                redis::Client::build_with_tls(
                    url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(config.read(base, ca)?),
                    },
                )
            }
            None => redis::Client::open(url.as_str()),
        }
        // The redis crate's errors do not echo the URL's password.
        .map_err(|e| config.invalid(format!("url: {e}")))?;
        Ok(Self {
            name: config.name.clone(),
            prefix: config.prefix.clone(),
            scopes: config.scopes.clone(),
            client,
            connection: OnceCell::new(),
            connect,
        })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::Unavailable {
            database: self.name.clone(),
            detail: e.to_string(),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, EngineError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        self.connection
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
            .map_err(|e| self.unavailable(e))
    }

    /// Runs `cmd`: an error the server answered is a refusal of `step`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        step: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, EngineError> {
        let mut con = self.connection().await?;
        cmd.query_async(&mut con).await.map_err(|e| {
            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                self.unavailable(format!("{step}: {e}"))
            } else {
                EngineError::Refused {
                    database: self.name.clone(),
                    step,
                    detail: e.to_string(),
                }
            }
        })
    }
}

#[async_trait]
impl Engine for RedisAcl {
    fn name(&self) -> &str {
        &self.name
    }

    fn scopes(&self) -> Vec<&str> {
        self.scopes.keys().map(String::as_str).collect()
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn create(&self, req: &LoginRequest) -> Result<Login, EngineError> {
        let password = random_password();
        let digest = ring::digest::digest(&ring::digest::SHA256, password.expose().as_bytes());
        let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg(&req.user)
            .arg("reset")
            .arg("on")
            .arg(format!("#{hash}"))
            .arg("resetchannels");
        for scope in &req.scopes {
            for rule in self.scopes.get(scope).into_iter().flatten() {
                cmd.arg(rule);
            }
        }
        let () = self.run("create", &cmd).await?;
        let mut dsn = self.connect.clone();
        let _ = dsn.set_username(&req.user);
        let _ = dsn.set_password(Some(password.expose()));
        Ok(Login {
            user: req.user.clone(),
            password,
            dsn: Secret::new(dsn.to_string()),
        })
    }

    /// `ACL DELUSER` is atomic and disconnects the user: disabling is
    /// removing (`SETUSER … off` would make a user that is already gone).
    async fn disable(&self, users: &[String]) -> Result<(), EngineError> {
        for user in users {
            self.remove(user).await?;
        }
        Ok(())
    }

    async fn remove(&self, user: &str) -> Result<(), EngineError> {
        let _deleted: u64 = self
            .run("delete user", redis::cmd("ACL").arg("DELUSER").arg(user))
            .await?;
        // DELUSER disconnects the user's clients itself; the kill is for
        // a server that would not, and mostly finds the user gone.
        match self
            .run::<u64>(
                "disconnect",
                redis::cmd("CLIENT").arg("KILL").arg("USER").arg(user),
            )
            .await
        {
            // Gone, with no client left to kill.
            Err(EngineError::Refused { detail, .. }) if detail.contains("No such user") => Ok(()),
            other => other.map(drop),
        }
    }

    async fn exists(&self, user: &str) -> Result<bool, EngineError> {
        let found: Option<redis::Value> = self
            .run("exists", redis::cmd("ACL").arg("GETUSER").arg(user))
            .await?;
        Ok(found.is_some_and(|v| v != redis::Value::Nil))
    }

    async fn existing(&self) -> Result<Vec<String>, EngineError> {
        let users: Vec<String> = self
            .run("list", &redis::cmd("ACL").arg("USERS").clone())
            .await?;
        Ok(users
            .into_iter()
            .filter(|u| crate::is_login_name(&self.prefix, u))
            .collect())
    }
}
